-- table.concat of a big table, over and over.
return { plan = function(ctx)
    local t = {}
    for i = 1, 100000 do t[i] = 'abcdefghijklmnop' end
    while true do
        local s = table.concat(t, ',')
    end
end }
