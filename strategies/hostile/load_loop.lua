-- Compiling a big generated chunk again and again: each load is one call into the compiler.
return { plan = function(ctx)
    local chunk = 'local x = 0 ' .. string.rep('x = x + 1 ', 25000)
    while true do
        local f = load(chunk)
    end
end }
