-- string.format with a huge format and many arguments, in a loop.
return { plan = function(ctx)
    local args = {}
    for i = 1, 5000 do args[i] = i end
    local fmt = string.rep('%5d', 5000)
    while true do
        local s = string.format(fmt, table.unpack(args))
    end
end }
